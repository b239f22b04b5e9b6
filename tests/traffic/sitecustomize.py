"""With SIDEWAYS_TRAFFIC_DIR set, records this process's torch.distributed traffic there
(``traffic_recorder``); without it, does nothing. Python imports this module at start-up from the
first sys.path entry that has one: put ``tests/traffic`` on PYTHONPATH of the command to record.
Every process the command starts inherits both, the stage processes of ``sideways train`` too."""

import os

if os.environ.get("SIDEWAYS_TRAFFIC_DIR"):
    import traffic_recorder

    traffic_recorder.install_when_imported()
