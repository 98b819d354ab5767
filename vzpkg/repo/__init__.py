"""Remote repository metadata, read without unpacking a cache."""
