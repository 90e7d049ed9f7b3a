"""Built-in run configurations (``fedms-jax run --config NAME``)."""
