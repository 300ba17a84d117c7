"""The Labels dashboard: a TensorBoard plugin for per-label metrics at hundreds to tens of thousands of labels.

:mod:`.table` defines the per-label table summary (written by ``trainer.summaries`` at each evaluation,
read back here); :mod:`.reader` loads those summaries from a logdir; :mod:`.plugin` serves them and the
static page (``static/``) to TensorBoard, which finds the plugin through the ``tensorboard_plugins`` entry
point of the package.  Nothing here imports TensorFlow or knows about training.
"""
