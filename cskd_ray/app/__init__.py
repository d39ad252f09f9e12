"""The top floor: the programs around the library.

The ``cskd-ray`` command line (parsing only), the commands it runs, starting Ray, the whole pipeline as one
job, the demo and the run report. Nothing in the library imports it.
"""
