"""Fleet mode: many hubs on one Redis or Redis Cluster (DESIGN section 8).

For scripts (seed 002)::

    fleet = hubhost.fleet.connect("redis://host:6379", prefix="", fleet="F")
    fleet.status("d1")["power"]            # JSON values, prefix applied
    fleet.system("S1")["Display/1"]        # -> device id
    fleet.exec("S1", "Display_1", "power", state=True)
    fleet.hubs(); fleet.owner("d1")

For a hub: `attach_exec` (hubhost.fleet.wiring) serves this hub's exec stream and routes
calls for devices it does not drive; ExecServer/ExecClient are the two ends (execs.py).
"""

from hubhost.fleet.execs import ExecClient, ExecServer, parse_target
from hubhost.fleet.keys import FleetKeys
from hubhost.fleet.session import Fleet, connect, is_cluster
from hubhost.fleet.views import StatusView, SystemView
from hubhost.functions import ExecError, SystemRef

__all__ = ["ExecClient", "ExecError", "ExecServer", "Fleet", "FleetKeys", "StatusView", "SystemRef",
           "SystemView", "connect", "is_cluster", "parse_target"]
