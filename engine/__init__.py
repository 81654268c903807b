"""duplexgate engine: the PersonaPlex dual-stream model served to many sessions at once."""
