"""The recipes' cards and sample data. A package so that an installed wheel finds its samples."""
