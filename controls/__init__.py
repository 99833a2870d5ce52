"""Pre-commit controls: pure functions of (state, proposal, policy) that accept or refuse.

Nothing in this package touches storage, clocks or the network. A control is one module that
defines a module-level `CONTROL`; `controls.registry` discovers them and orders them by priority.
"""
