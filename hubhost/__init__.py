"""hubhost: an embedded Lua driver host for edge hubs."""

__version__ = "0.1.0"
