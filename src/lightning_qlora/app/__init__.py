"""The application: a run's stages (compose, build, validate, fit, test, report), evaluate,
generate, estimate, and the config schema.

May import: everything below it (core, cpu, io, lightning, tasks); the CLI imports this.
"""
