"""TFDS source through tfds.data_source on a tiny builder prepared in the test (ArrayRecord)."""
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.sources import build_source, default_data_config
from data_pipelines.sources.tfds_source import TFDSSource


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")  # PNG bytes: numpy images need TF.
  return buffer.getvalue()


def _image(i):
  return ((np.arange((8 + i) * 9).reshape(8 + i, 9) * (i + 1)) % 256).astype(np.uint8)


class TinyCxrTfds(tfds.core.GeneratorBasedBuilder):
  """5 train / 3 test grayscale images of varying size, 3 classes, a filename feature."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 1)),
        "label": tfds.features.ClassLabel(names=["normal", "nodule", "effusion"]),
        "image/filename": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 5), "test": self._generate_examples(5, 3)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      yield i, {"image": _png(_image(i)), "label": i % 3, "image/filename": f"img{i}.png"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  TinyCxrTfds(data_dir=str(directory), file_format="array_record").download_and_prepare()
  return str(directory)


def test_tfds_records(data_dir):
  config = default_data_config()
  config.update(dict(source="tfds", tfds_name="tiny_cxr_tfds", data_dir=data_dir))
  source = build_source(config, "train")
  assert len(source) == 5 and source.class_names == ["normal", "nodule", "effusion"]
  assert not source.multi_label and source.num_channels == 1
  seen = {}
  for i in range(len(source)):
    example = source[i]
    assert example["image"].dtype == np.uint8 and example["label"].dtype == np.int32
    number = int(example["id"][3:-4])
    np.testing.assert_array_equal(example["image"][:, :, 0], _image(number))
    assert example["label"] == number % 3
    seen[example["id"]] = int(example["label"])
  assert sorted(seen) == sorted(source.ids) == [f"img{i}.png" for i in range(5)]
  assert [seen[i] for i in source.ids] == source.labels.tolist()
  assert len(build_source(config, "test")) == 3


def test_tfds_errors(data_dir):
  with pytest.raises(ValueError, match=r"no feature 'pixels'.*features are: image, label"):
    TFDSSource("tiny_cxr_tfds", "train", data_dir=data_dir, image_key="pixels")
  config = default_data_config()
  config.source = "tfds"
  with pytest.raises(ValueError, match="data.tfds_name is required"):
    build_source(config, "train")
