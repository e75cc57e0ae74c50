"""The command line: one module per --mode, each owning its flags and a `run()`
(m6_jax/main.py dispatches). Mode modules import the libraries they call inside `run()`:
flags are defined and parsed, and the process bootstrapped, before JAX starts. Libraries
take typed arguments; no module outside this package reads a flag."""
