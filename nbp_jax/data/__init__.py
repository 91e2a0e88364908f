"""Video data: synthetic clips, array_record datasets (TFDS, no TensorFlow), local UCF-101/K600, grain pipelines."""
