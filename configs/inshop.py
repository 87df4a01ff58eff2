"""DeepFashion In-shop: a ResNet-18 old model on 30% of the 3,997 training items, then ResNet-50
new models (independent, BCT, NDPP, ODPP), tested by Recall@{1,10,20,30,40,50} and mAP of the
14,218 queries against the 12,612 gallery images (method.md §6-§8).

    python -m bcl_jax.data.prepare --dataset=inshop --src=$INSHOP --dst=$PREPARED   # optional
    python -m bcl_jax.main --config=configs/inshop.py --workdir=$RUN \
        --config.data.inshop.root=$INSHOP [--config.data.prepared=$PREPARED]

$INSHOP holds list_eval_partition.txt and img/. The recipe is GLDv2's (configs/gldv2.py: ImageNet
backbones through `model.pretrained`, shorter side 256 then a random 224 crop and flip, centre
crop for evaluation) with In-shop's schedule: 200 epochs, lr ×0.1 at 50/100/150 (PrunNet's
In-shop config; method.md §6).

Meant for one GPU or a TPU v4-8 / v5e-8: 25,882 training images × 200 epochs is about 5.2M
images per model, a few hours at 224 px. Expect BCT new/old Recall@1 above old/old; the published
tables (Zhou et al. 2025) are the reference. The argument is GLDv2's (configs/gldv2.py):
`:methods=odpp`, `:methods=bct+lce`, `:methods=none` (the old model alone), `smoke` (shrinks
everything for the tests). The references publish no In-shop settings for LCE, UniBCT,
Hot-Refresh and AdvBCT: their GLDv2 settings are kept, with In-shop's schedule.
"""

from configs import common, gldv2


def get_config(arg=None):
    smoke, methods = common.options(arg)
    c = common.base_config()
    c.data.name = 'inshop'
    c.data.image_size = 224
    c.data.augment, c.data.train_resize_size = 'random_crop', 256
    c.data.eval_resize_size = 256
    c.data.num_threads = 16
    c.old.model = common.model(arch='resnet18', width=64, embedding_dim=256, head='cosface')
    c.new.model = common.model(arch='resnet50', width=64, embedding_dim=256, head='cosface')
    for stage in (c.old, c.new):
        stage.train = common.train(
            epochs=200.0, batch_size=128, learning_rate=0.1, lr_drop_epochs=(50.0, 100.0, 150.0)
        )
    c.perturb.start_epochs = 10.0
    c.perturb.refresh_every_epochs = 5.0
    c.methods = ('independent', 'bct', 'ndpp', 'odpp') if methods is None else methods
    c.eval.batch_size = 512
    c.ckpt.every_steps = 2000
    c.log_every_steps = 100
    if smoke:
        gldv2.shrink_to_smoke(c)
    return c
