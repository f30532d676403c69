"""Control plane: threshold tuning, ramp adjustment, the accuracy guard, calibration, the controller actor and
its client, replay. Import the module you need (nothing is imported here: importing the engine must not load
the controller).
"""
