"""tierpool core: domain logic, Lua scripts, config cache and leader.

Nothing here imports ``workers``.
"""
