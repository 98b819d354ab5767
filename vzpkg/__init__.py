"""vzpkg: OS template caches and a container runtime in the OpenVZ tradition."""

__version__ = "0.1.0"
