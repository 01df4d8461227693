"""Integrations of dstp with other tools. Nothing in dstp imports them; each imports its tool only inside its
own module, so `import dstp` works whether or not the tool is installed.

- `dstp.integrations.lmms_eval`: the lmms-eval model `dstp` (install with `pip install "dstp[eval]"`).
"""


def lmms_eval_models():
    """lmms-eval's `lmms_eval.models` entry point: its model `dstp` is `dstp.integrations.lmms_eval.DSTPModel`
    (chat interface). It lives here, apart from that module, because lmms-eval builds its registry while its
    models package is first imported, which importing that module itself does."""
    from lmms_eval.models.registry_v2 import ModelManifest  # lmms-eval is optional: only its entry point calls this

    return ModelManifest(model_id="dstp", chat_class_path="dstp.integrations.lmms_eval.DSTPModel")
