"""Defaults shared by every experiment config; each config file overrides what it needs.

Groups: data, old (model, train, checkpoint), new (model, train), compat (loss weights and
temperature), eval, ckpt, mesh. Units are in the names (`*_steps`, `*_epochs`).
"""
from ml_collections import config_dict

METHODS = ('independent', 'bct', 'bct_influence', 'l2')


def model(arch='cifar_resnet', width=16, depth=20, embedding_dim=128, head='cosface'):
  return config_dict.ConfigDict(dict(
      arch=arch, width=width, depth=depth, embedding_dim=embedding_dim,
      head=head,          # softmax | cosface | arcface
      scale=30.0, margin=0.3))


def train(epochs=30.0, batch_size=128, learning_rate=0.1, lr_drop_epochs=(15.0, 25.0)):
  return config_dict.ConfigDict(dict(
      epochs=epochs,
      steps=0,            # > 0 overrides epochs
      batch_size=batch_size,
      learning_rate=learning_rate,
      momentum=0.9,
      weight_decay=5e-4,
      warmup_steps=0,
      lr_drop_epochs=lr_drop_epochs,
      lr_drop_factor=0.1))


def base_config():
  c = config_dict.ConfigDict()
  c.seed = 0
  c.data = config_dict.ConfigDict(dict(
      name='synthetic',   # synthetic | folder
      image_size=32,
      old_split='classes',  # classes: old model sees 30% of classes; images: 30% of each class
      old_fraction=0.3,
      split_seed=0,
      crop_padding=4,
      flip=True,
      num_threads=2,
      synthetic=config_dict.ConfigDict(dict(
          seed=0,  # the benchmark itself: which classes and images exist
          train_families=100, siblings_per_family=10, test_siblings_per_family=2,
          train_images_per_class=10, test_images_per_class=10, queries_per_class=3,
          coarse_bases=24, fine_bases=24, sibling_scale=0.35, nuisance_scale=0.3,
          noise_scale=0.15, max_shift=3)),
      folder=config_dict.ConfigDict(dict(
          train_dir='', query_dir='', gallery_dir='', skip_corrupt=False)),
  ))
  c.old = config_dict.ConfigDict(dict(
      model=model(),
      train=train(),
      checkpoint='',      # a trained old model's checkpoint directory; '' trains one
  ))
  c.new = config_dict.ConfigDict(dict(model=model(), train=train()))
  c.methods = ('independent', 'bct')
  c.compat = config_dict.ConfigDict(dict(
      weight=1.0,         # λ of the method's compatibility term
      temperature=0.07,   # τ of L_comp
  ))
  c.eval = config_dict.ConfigDict(dict(batch_size=256, ks=(1, 5, 10), query_block=256))
  c.ckpt = config_dict.ConfigDict(dict(every_steps=500, max_to_keep=2))
  c.log_every_steps = 50
  c.mesh = config_dict.ConfigDict(dict(data=-1))  # -1: all devices
  return c
