"""Small evaluators: built from a config, `run(params)` yields `(name, value)` pairs."""
