"""The client layer: the Keras NumPyClient and, for simulation, misbehaving clients."""
