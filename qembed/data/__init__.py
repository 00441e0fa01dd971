"""Data formats: text inputs, JSONL records, BEIR retrieval folders, training pairs."""
