"""tierpool wire messages: msgspec Structs decoded from flat stream field maps."""
