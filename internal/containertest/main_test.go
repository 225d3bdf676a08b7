package containertest

import (
	"os"
	"testing"

	"github.com/blobseal/blobseal/internal/fusetest"
)

// TestMain fails the run if a mount made in an image root outlives the tests.
func TestMain(m *testing.M) { os.Exit(fusetest.RunMain(m)) }
