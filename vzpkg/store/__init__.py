"""The store side: published caches, archives (pack and the safe unpack)."""
