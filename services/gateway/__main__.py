"""python -m services.gateway"""

from smi.settings import get_settings
from smi.stages import run_stage

run_stage("gateway", get_settings())
