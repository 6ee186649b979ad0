"""vLLM-like backend simulator: a virtual-time scheduler, its profiles, and an OpenAI-compatible server.

    from extproc.sim import Scheduler, get_profile
    s = Scheduler(get_profile("h100-llama3-8b"))
    s.add("r1", prompt_tokens=200, max_tokens=100, now=0.0)
    t = 0.0
    while s.has_work:
        t = s.step(t).end
"""

from extproc.sim.profiles import PROFILES, Profile, get_profile, load_profile
from extproc.sim.scheduler import Request, Scheduler, State, StepResult

__all__ = ["PROFILES", "Profile", "Request", "Scheduler", "State", "StepResult", "get_profile", "load_profile"]
