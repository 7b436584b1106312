import ctypes, threading, time, sys
import torch
lib = ctypes.CDLL("/tmp/par.so")
x = torch.randn(64, 640)
def bench(tag):
    s = time.perf_counter(); lib.par(2, 20000); dt = (time.perf_counter() - s) / 20000
    s = time.perf_counter()
    for _ in range(5000): torch.nn.functional.rms_norm(x, (640,))
    print(tag, f"omp parallel(2) {dt*1e6:.2f} us  rms_norm {(time.perf_counter()-s)/5000*1e6:.2f} us", flush=True)
order = sys.argv[1]
if order == "worker-only":
    for _ in range(2):
        th = threading.Thread(target=bench, args=("worker",)); th.start(); th.join()
else:
    bench("main"); th = threading.Thread(target=bench, args=("worker",)); th.start(); th.join()
