"""python -m services.janitor"""

from smi.settings import get_settings
from smi.stages import run_stage

# Guarded: process pools that spawn workers re-import the main module.
if __name__ == "__main__":
    run_stage("janitor", get_settings())
