"""Text corpora and tokenizers (the WebDataset pipeline builds on these)."""
