"""The ml layer: Keras model builders and the compiled training loops that run them."""
