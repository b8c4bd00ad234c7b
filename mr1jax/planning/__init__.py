"""Planning a run before renting hardware: the real jitted steps compiled for a TPU / GPU / CPU target.

`programs` builds each step abstractly for a config, `compile` compiles one and reads its memory / cost,
`targets` names the devices, `cost` counts analytic FLOPs, `planner` puts them together (`make_plan`) and
`report` prints the tables of `python -m mr1jax.plan`.
"""
