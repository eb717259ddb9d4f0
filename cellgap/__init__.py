"""cellgap: frozen foundation-model encoders + one shared CISCA decoder for cell instance
segmentation and classification, packaged as MONAI bundles."""

__version__ = "0.1.0"
