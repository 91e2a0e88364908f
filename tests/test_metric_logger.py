"""MetricWriter: scalars, images and text in the TensorBoard event file (read back from its bytes), scalars only in
metrics.jsonl, nothing at all from a disabled writer."""

import glob
import io
import os
import struct

import numpy as np
from PIL import Image

from nbp_jax import metric_logger


def read_events(path):
  """The Event protos of a TensorBoard event file (TFRecord: u64 length, u32 crc, data, u32 crc per record)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 12 + length + 4
  return out


def summaries(workdir):
  """{(step, tag): Summary.Value} of the one event file in `workdir`."""
  (path,) = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  return {(e.step, v.tag): v for e in read_events(path) if e.HasField('summary') for v in e.summary.value}


def test_images_and_text_reach_tensorboard_and_only_scalars_the_jsonl(tmp_path):
  workdir = str(tmp_path)
  image = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  writer = metric_logger.MetricWriter(workdir, enabled=True)
  writer.write_image(3, 'samples/grid', image)
  writer.write_text(1, 'config', '{\n  "seed": 0\n}')
  writer.write(3, {'loss': 1.5})
  writer.close()

  values = summaries(workdir)
  png = values[(3, 'samples/grid')].image
  assert (png.height, png.width, png.colorspace) == (12, 20, 3)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.encoded_image_string))), image)  # lossless
  text = values[(1, 'config/text_summary')]
  assert text.metadata.plugin_data.plugin_name == 'text'
  assert text.tensor.string_val == [b'    {\n      "seed": 0\n    }']  # a markdown code block: shown verbatim
  assert values[(3, 'loss')].simple_value == 1.5
  assert metric_logger.read_metrics(workdir) == [{'step': 3, 'loss': 1.5}]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metric_logger.MetricWriter(str(tmp_path), enabled=False)
  writer.write_image(1, 'samples/grid', np.zeros((4, 4, 3), np.uint8))
  writer.write_text(1, 'config', 'x')
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []
