"""
The toy world: a small world of pictures and conversations in which the whole ARMOR recipe runs end to end on a
laptop and can be measured, since no model hub is reachable here and ARMOR's data was never released. It imports the
core (armor, vqgan, data, tokenizer; train.py in a subprocess); nothing in the core imports it.

  pictures.py     coloured shapes and twelve scenes at 64 px, and the rule-based judges that score drawings
  world.py        conversations of every type about them, the base's text pool, the evaluation's prompt sets
  vqgan_train.py  the toy VQGAN's trainer (Chameleon's architecture from vqgan.py, at toy width)
  pipeline.py     data -> BPE -> VQGAN -> code cache -> base -> WoHG stages 1-3 -> the shipped checkpoints below
  eval.py         the evaluation table (GenEval-style, scenes, understanding retention, modality, ti2ti)
  ablations.py    the paper's ablations in the toy world
  probe.py        where positions get lost: what the toy models' tokens carry, and what a base or stage 2 learns
                  from relation data alone, in minutes
  armor/ base/ vqgan/        the shipped checkpoints (what sample.py and eval.py load by default)
  stage0.args ... stage3.args  train.py's defaults when it gets no data or model arguments

  python -m toy                          # build everything (resumable); --quick for a smoke run
  python -m toy prepare --stage 2        # the data of a bare `python train.py --stage 2` (train.py runs it itself)
  python -m toy.eval                     # the measured table, eval.md
  python -m toy.ablations all            # switching, embeddings, single-stage
  python -m toy.probe relation           # a base on relation questions alone (also: tokens, draw)
  python -m toy.world sample --out DIR   # a contact sheet of the world
  python -m toy.vqgan_train --images DIR --out DIR   # the toy VQGAN on a folder of images
"""
