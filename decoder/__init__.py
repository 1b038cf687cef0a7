"""pyimgcrypt: encrypted OCI image layers for containerd. Holds the version; imports nothing."""

__version__ = "0.1.0"
