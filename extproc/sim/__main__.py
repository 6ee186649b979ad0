"""`python -m extproc.sim`: the same command as `tokenpools sim-backend`."""

from extproc.sim.cli import sim_backend

if __name__ == "__main__":
    sim_backend(prog_name="python -m extproc.sim")
