import os

# Keras 3 is the numerical reference; it must run on the torch backend, chosen before import.
os.environ["KERAS_BACKEND"] = "torch"
