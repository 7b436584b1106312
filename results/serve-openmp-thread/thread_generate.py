import threading, time, torch
torch.set_num_threads(2)
from specdecode import SpeculativeDecoder, load_model
target = load_model("default")
dec = SpeculativeDecoder(target, "ar")
p = "Write a long story about a dragon who learns to cook."
dec.generate(p, max_new_tokens=8)
def run(tag):
    with torch.inference_mode():
        n = torch.get_num_threads()
        t = time.perf_counter(); dec.generate(p, max_new_tokens=64); dt = time.perf_counter() - t
    print(tag, "threads", n, "tok/s %.1f" % (64 / dt), flush=True)
run("main")
th = threading.Thread(target=run, args=("worker",)); th.start(); th.join()
run("main")
th = threading.Thread(target=run, args=("worker",)); th.start(); th.join()
