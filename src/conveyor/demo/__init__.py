"""Demo material: a small Shakespeare corpus and a character-level transformer to train on it."""
