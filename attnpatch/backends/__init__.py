"""Built-in backends, one family per module; each module registers its own backends when imported.

The registry imports every public module here on first use, so adding a backend means adding one file.
"""
