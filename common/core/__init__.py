"""The floor every other part of common/ stands on: files, logging, hashing, errors, tables. Imports nothing
of the project."""
