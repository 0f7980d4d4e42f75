__version__ = "0.1.0"
#: version of the compressed-checkpoint layout; a reader refuses a newer one
FORMAT_VERSION = 2
