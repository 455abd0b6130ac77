"""tierpool core: domain logic, Lua scripts, config cache and leader. Imports nothing from workers."""
