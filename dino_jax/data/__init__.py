"""tf.data input pipelines (the only package that imports TensorFlow)."""
