"""Models from a Hugging Face hub: search, file listings and resumable downloads."""
