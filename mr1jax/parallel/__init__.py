"""The parallel runtime: the device mesh and the logical-axis sharding rules (`sharding`), several processes /
hosts on `jax.distributed` (`distributed`), directories on local disk or an object store (`storage`), and the facts of the accelerators a run is planned for
(`accelerators`). The lowest layer: it imports nothing else of mr1jax."""
