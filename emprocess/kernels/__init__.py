"""Pure array kernels: arrays in, arrays out; no Flask, Airflow or storage imports."""
