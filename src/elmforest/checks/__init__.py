"""Validation (`elmforest check`): which kind of folder a path is and its rules (`check`),
the rules per kind of folder (`folders`, `mixtures`), and what a check finds (`problems`). Reads
every layer below; nothing imports it but the command line."""
