"""PersonaPlex-compatible model code: Mimi codec and the temporal/depth transformers."""
