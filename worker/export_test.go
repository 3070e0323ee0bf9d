package worker

// Crash makes w behave as a crashed worker to the rest of the cluster (for
// tests): its heartbeat stops without its key being deleted and its NATS
// connections close at once. Stop afterwards only stops what runs on the host.
func Crash(w *Worker) {
	w.cluster.Abandon()
	w.nc.Close()
	w.storeNC.Close()
	if w.envdNC != nil {
		w.envdNC.Close()
	}
}

// AfterTests run once every test of the package has run (TestMain): the
// external tests clean up what they share across tests with it.
var AfterTests []func()
