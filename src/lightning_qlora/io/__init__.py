"""Model I/O: loading (the embedded default, local directories, hub ids), PEFT export and merge.

May import: ``lightning_qlora.core``; never Lightning.
"""
