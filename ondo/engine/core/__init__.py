"""The engine core in a process of its own (`ondo serve --engine-process`): `EngineCoreClient` in
the API server process talks to `ondo.engine.core.process` through plain-data messages over ZeroMQ."""
