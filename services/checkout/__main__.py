"""python -m services.checkout"""

from smi.settings import get_settings
from smi.stages import run_stage

run_stage("checkout", get_settings())
