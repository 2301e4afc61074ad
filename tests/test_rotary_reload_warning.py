"""vLLM's harmless "RotaryEmbedding: Failed to load weights" (every weight sync of a RoPE model) is dropped;
the same warning for any other layer, and every other record of that logger, still shows."""
import logging

from hicra_rl.rollout.weight_sync import VLLM_RELOAD_LOGGER, quiet_rotary_reload_warning


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_rotary_reload_warning_is_dropped():
    logger = logging.getLogger(VLLM_RELOAD_LOGGER)
    # Earlier tests in the same process may leave logging muted (a library's dictConfig disables existing
    # loggers, vLLM sets its level): this test is about our filter, so it starts from a logger that emits.
    saved = (logger.disabled, logger.level, logging.root.manager.disable)
    logger.disabled, logger.level = False, logging.WARNING
    logging.disable(logging.NOTSET)
    sink = Collect()
    logger.addHandler(sink)
    try:
        quiet_rotary_reload_warning()
        quiet_rotary_reload_warning()  # idempotent: one filter
        assert len(logger.filters) == 1
        # the exact call vLLM makes (finalize_layerwise_processing): logger.warning("%s: ...", class name)
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
        logger.warning("Allocating %.1f MB of device memory", 3.0)
        assert sink.messages == ["QKVParallelLinear: Failed to load weights", "Allocating 3.0 MB of device memory"]
    finally:
        logger.removeHandler(sink)
        logger.filters.clear()
        logger.disabled, logger.level = saved[0], saved[1]
        logging.disable(saved[2])


def test_vllm_logs_the_warning_under_that_logger_name():
    """The module that warns is the one we filter (vLLM names loggers by module)."""
    import importlib.util

    spec = importlib.util.find_spec(VLLM_RELOAD_LOGGER)
    assert spec is not None and spec.origin.endswith("layerwise.py")
    source = open(spec.origin, encoding="utf-8").read()
    assert 'logger.warning("%s: Failed to load weights", layer.__class__.__name__)' in source
    assert "logger = init_logger(__name__)" in source
